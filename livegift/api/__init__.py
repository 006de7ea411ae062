"""Transport: the Starlette app, HTTP routes and the WebSocket endpoint."""
