"""The HTTP layer both servers share: an ASGI app with a route table, served by uvicorn."""
