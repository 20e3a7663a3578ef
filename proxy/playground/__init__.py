"""The browser playground at `GET /playground` (routes.py; the page in static/)."""
