"""HTTP API and web page for an SDXS pipeline: `create_app(pipe, settings)` returns a FastAPI app.

from sdxs.server import ServerSettings, create_app
app = create_app(pipe, ServerSettings(max_queue=8))
uvicorn.run(app, host="127.0.0.1", port=8000)   # or `sdxs serve`
"""

from sdxs.server.app import DeviceGate, QueueFull, ServerSettings, create_app

__all__ = ["DeviceGate", "QueueFull", "ServerSettings", "create_app"]
