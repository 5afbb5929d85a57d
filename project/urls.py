"""HTTP routes."""

from django.urls import path

from pingpong import views

urlpatterns = [
    path("", views.index, name="index"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("api/broadcast", views.api_broadcast, name="broadcast"),
    path("api/stats", views.api_stats, name="stats"),
    path("api/history/<str:topic>", views.api_history, name="history"),
]
