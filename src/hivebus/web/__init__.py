"""The dashboard and HTTP API: ``create_app`` builds the FastAPI application."""

from __future__ import annotations

from hivebus.web.app import create_app

__all__ = ["create_app"]
