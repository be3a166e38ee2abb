"""The router's shared aiohttp session holder (``app.state.aiohttp_client_wrapper``): started by
the app's lifespan, called for the session by the request path."""

from typing import Any


class AiohttpClientWrapper:
    async_client: Any = None

    def start(self) -> None:
        import aiohttp

        self.async_client = aiohttp.ClientSession()

    async def stop(self) -> None:
        await self.async_client.close()
        self.async_client = None

    def __call__(self) -> Any:
        assert self.async_client is not None
        return self.async_client
