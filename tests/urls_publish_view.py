"""The project's routes plus `GET /test/publish?topic=T`: a sync view that publishes with `pingpong.publish`."""

from django.http import HttpRequest, JsonResponse
from django.urls import path

import pingpong
from pingpong import publishing
from project.urls import urlpatterns as project_urlpatterns


def publish_view(request: HttpRequest) -> JsonResponse:
    """Publish `{"from": "sync view"}` to ?topic= from sync code, as a project's view would."""
    sent = pingpong.publish(request.GET["topic"], {"from": "sync view"}, id=request.GET.get("id"))
    return JsonResponse({**sent, "on_server_loop": publishing.server_loop() is not None})


urlpatterns = [*project_urlpatterns, path("test/publish", publish_view)]
