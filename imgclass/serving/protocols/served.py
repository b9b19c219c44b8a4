"""The model as the protocol routes see it: its name, its server and batcher, its statistics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from ...errors import NotReady, RequestError
from ...web.app import Request
from ..backends import Backend
from ..batching import Batcher, Job, Result
from ..settings import ServerSettings
from .stats import ModelStats
from .tensors import Limits
from .wire import check_model


class ModelServer(Protocol):
    """What the routes use of serving.app's ModelServer (which imports this package to add them)."""

    settings: ServerSettings
    name: str
    backend: Backend
    batcher: Batcher
    threads: int
    ready: bool


@dataclass(frozen=True)
class Served:
    """What every protocol route answers from."""

    server: ModelServer
    name: str  # --model-name: the {model} of the routes
    stats: ModelStats

    @property
    def limits(self) -> Limits:
        # A request's batch may fill the queue but no more: a larger one would be refused in part.
        return Limits(max_batch=self.server.batcher.max_queue, max_image=self.server.settings.max_upload_bytes)

    @property
    def labels(self) -> list[str]:
        return self.server.backend.labels

    def check(self, request: Request, ready: bool = True) -> None:
        """404 for another model or version; 503 while the model loads or the server drains."""
        check_model(request, self.name)
        if ready and not self.server.ready:
            raise NotReady("The model is not loaded yet, or the server is shutting down; retry shortly.", retry_after=1)

    async def classify(self, images: list[bytes], top: int) -> list[Result]:
        """Each image through the dynamic batcher, as /predict's; all answered, or the first error."""
        submit = self.server.batcher.submit
        if len(images) == 1:
            return [await submit(Job(images[0], top))]
        count = len(images)

        async def one(index: int, data: bytes) -> Result:
            try:
                return await submit(Job(data, top))
            except RequestError as exc:  # say which image it was; the status stays the same
                raise type(exc)(f"Image {index + 1} of {count}: {exc.message}") from None

        tasks = [asyncio.ensure_future(one(i, data)) for i, data in enumerate(images)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # One failed (or the client left): the rest are dropped, in the queue or before inference.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
