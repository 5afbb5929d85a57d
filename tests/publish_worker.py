"""A Celery-style worker process for the end-to-end tests: `python -m tests.publish_worker TOPIC COUNT`.

It sets Django up as a worker does, calls the sync `pingpong.publish` COUNT times in a row
(data `{"n": i}`, id `worker-<i>`), prints `published COUNT`, then waits for its stdin to
close before exiting, so the test can count its Redis connections while it still runs.
"""

import os
import sys

import django


def main(topic: str, count: int) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    django.setup()
    import pingpong

    for n in range(count):
        pingpong.publish(topic, {"n": n}, id=f"worker-{n}")
    print(f"published {count}", flush=True)
    sys.stdin.read()  # until the test closes it


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
