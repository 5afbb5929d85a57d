"""HTTP routes."""

from django.contrib.auth import views as auth_views
from django.urls import path

from pingpong import views

urlpatterns = [
    path("", views.index, name="index"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("api/broadcast", views.api_broadcast, name="broadcast"),
    path("api/publish", views.api_publish, name="publish"),
    path("api/stats", views.api_stats, name="stats"),
    path("api/presence/<str:topic>", views.api_presence, name="presence"),
    path("api/history/<str:topic>", views.api_history, name="history"),
    # Django's own login and logout (POST only), so a browser's session is a user on its websocket.
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
