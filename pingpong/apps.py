from django.apps import AppConfig


class PingpongConfig(AppConfig):
    name = "pingpong"
    verbose_name = "pingpong"
