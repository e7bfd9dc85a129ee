"""The router list. Another layer adds its endpoints by appending its router here (one line each)."""

from __future__ import annotations

from fastapi import APIRouter

from deepseek_serve.api.routes import admin, chat, completions, conversations, health, metrics, models

api_routers: list[APIRouter] = [
    health.router,
    models.router,
    chat.router,
    completions.router,
    metrics.router,
    conversations.router,
    admin.router,
]
