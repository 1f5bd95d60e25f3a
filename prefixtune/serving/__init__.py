"""Serving many prefixes over one frozen model: the batching engine and the HTTP server."""
