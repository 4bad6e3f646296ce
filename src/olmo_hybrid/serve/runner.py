"""Running the app under uvicorn: in the foreground (``olmo-hybrid serve``) or on a background thread (tests,
benchmarks), with graceful shutdown either way."""

from __future__ import annotations

import threading
import time


def uvicorn_server(app, host: str, port: int, shutdown_timeout: float, log_level: str = "info"):
    """A uvicorn server for ``app`` whose shutdown first drains the app (``app.state.drain()``: in-flight requests
    finish or are aborted, so every stream still ends with its final chunk), then closes the connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            drain = getattr(app.state, "drain", None)
            if drain is not None:
                await drain()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout, access_log=log_level == "debug")
    return Server(config)


def run(app, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM start a graceful shutdown)."""
    uvicorn_server(app, host, port, shutdown_timeout, log_level).run()


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` serves ``app`` on 127.0.0.1 on a free port from a thread; leaving the
    block shuts it down gracefully (``shutdown_timeout`` seconds for in-flight requests)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 5.0,
                 start_timeout: float = 30.0, log_level: str = "warning"):
        self.server = uvicorn_server(app, host, port, shutdown_timeout, log_level)
        self.host, self.start_timeout = host, start_timeout
        self.thread = threading.Thread(target=self.server.run, name="olmo-hybrid-http", daemon=True)
        self.url: str | None = None

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {self.start_timeout} s")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.server.config.timeout_graceful_shutdown + 30)
