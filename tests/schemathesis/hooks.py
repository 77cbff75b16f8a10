"""Schemathesis hooks for Berth's API run (tests/api.rs).

A generated image reference would make the server try to pull from whatever host the
generator made up; every `image` is pointed at a closed port on loopback instead, so a deploy
fails fast and nothing leaves this machine. Only non-empty strings are replaced: a generated
negative case (an `image` of the wrong type, or empty) must stay negative, or the server's 2xx for the
mended request reads as "schema-violating request accepted".
"""
import schemathesis

DEAD_REGISTRY_IMAGE = "127.0.0.1:9/schemathesis/none:latest"


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict) and isinstance(body.get("image"), str) and body["image"]:
        body["image"] = DEAD_REGISTRY_IMAGE
    return body
