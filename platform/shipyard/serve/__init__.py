"""Stage 7, serve: the Ray Serve endpoint for `models:/<name>@champion` and its HTTP ingress."""
