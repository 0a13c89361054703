"""The two ways rlcore drives SGLang, both implementing `engine.Engine` plus weight and memory control.

`SGLangEngine` wraps an in-process `sglang.Engine` (offline mode: scheduler subprocesses on this node's
GPUs); `SGLangServer` speaks the HTTP API of a server at a URL, or of one rlcore launched and owns.
The method names follow SGLang's own (`update_weights_from_tensor`, `flush_cache`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from rlcore import SamplingParams
from rlcore.errors import RLCoreError
from rlcore_backends.common.vision import ENGINE_IMAGES, png_data_url
from rlcore_backends.rollout.engine import Completion
from rlcore_backends.rollout.sglang.api import (SGLangError, check_result, disk_update_request, distributed_update_request,
                                        generate_request, init_group_request, memory_request, parse_generate,
                                        tensor_update_request)
from rlcore_backends.rollout.sglang.server import HTTPClient, ServerProcess

INSTALL = ("install SGLang on a CUDA machine: pip install 'rlcore-backends[sglang]' (see "
           "https://docs.sglang.ai/get_started/install.html)")


def import_sglang() -> Any:
    """The `sglang` package, or an error naming the extra to install."""
    try:
        import sglang
    except ImportError as e:
        raise RLCoreError(f"--rollout sglang needs the sglang package ({e}): {INSTALL}") from None
    return sglang


def tensor_serializer() -> Callable[[Any], str]:
    """SGLang's `MultiprocessingSerializer` as text, the form `/update_weights_from_tensor` takes."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError as e:
        raise RLCoreError(f"rollout.sync=tensor in server mode serializes tensors with SGLang's own serializer "
                          f"({e}): {INSTALL}, or use rollout.sync=disk") from None
    return lambda obj: MultiprocessingSerializer.serialize(obj, output_str=True)


def row_images(multimodal: list[dict[str, Any]] | None, encode: Callable[[Any], Any]) -> list[list[Any]] | None:
    """Each row's images (`ENGINE_IMAGES`), encoded for the transport, or None when no row has any."""
    rows = [(m or {}).get(ENGINE_IMAGES) or [] for m in multimodal or []]
    return [[encode(image) for image in images] for images in rows] if any(rows) else None


class SGLangEngine:
    """`Engine` over an in-process `sglang.Engine` (or any object with its method signatures)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @classmethod
    def launch(cls, server_args: dict[str, Any]) -> SGLangEngine:
        """Start `sglang.Engine(**server_args)` (ServerArgs field names)."""
        return cls(import_sglang().Engine(**server_args))

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 multimodal: list[dict[str, Any]] | None = None) -> list[Completion]:
        """One completion per prompt; rows with images pass them (PIL) as `image_data`."""
        request = generate_request(prompts, params, row_images(multimodal, lambda image: image))
        return parse_generate(self.engine.generate(**request), len(prompts))

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, Tensor]], flush_cache: bool) -> None:
        check_result("update_weights_from_tensor", self.engine.update_weights_from_tensor(
            named_tensors=named_tensors, load_format=None, flush_cache=flush_cache))

    def update_weights_from_disk(self, model_path: str) -> None:
        result = self.engine.update_weights_from_disk(**disk_update_request(model_path))
        check_result("update_weights_from_disk", result)

    def flush_cache(self) -> None:
        check_result("flush_cache", self.engine.flush_cache())

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        check_result("release_memory_occupation", self.engine.release_memory_occupation(**memory_request(tags)))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        check_result("resume_memory_occupation", self.engine.resume_memory_occupation(**memory_request(tags)))

    def close(self) -> None:
        """Shut the engine and its subprocesses down."""
        self.engine.shutdown()


class SGLangServer:
    """`Engine` over SGLang's HTTP API; `process` is the server rlcore launched (stopped by `close`)."""

    def __init__(self, client: HTTPClient, tp_size: int, process: ServerProcess | None = None,
                 serialize: Callable[[Any], str] | None = None) -> None:
        self.client, self.tp_size, self.process = client, tp_size, process
        self._serialize = serialize

    def check_health(self) -> None:
        """Raise unless `GET /health` answers 200 (SGLang answers 503 while it starts or is unhealthy)."""
        status = self.client.get("/health")
        if status != 200:
            raise SGLangError(f"the SGLang server at {self.client.url} is not healthy (GET /health answered HTTP "
                              f"{status}): wait until it has loaded the model, or check its log")

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 multimodal: list[dict[str, Any]] | None = None) -> list[Completion]:
        """One `/generate` request for the batch; rows with images send them as PNG data URLs in `image_data`."""
        request = generate_request(prompts, params, row_images(multimodal, png_data_url))
        return parse_generate(self.client.post("/generate", request), len(prompts))

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, Tensor]], flush_cache: bool) -> None:
        """Colocated only: the payload carries CUDA IPC handles (shared-memory handles for CPU tensors)."""
        serialize = self._serialize = self._serialize or tensor_serializer()
        payload = tensor_update_request([serialize(named_tensors) for _ in range(self.tp_size)], flush_cache)
        check_result("/update_weights_from_tensor", self.client.post("/update_weights_from_tensor", payload))

    def update_weights_from_disk(self, model_path: str) -> None:
        check_result("/update_weights_from_disk",
                     self.client.post("/update_weights_from_disk", disk_update_request(model_path)))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> None:
        """Blocks until rank 0 (this process) joins the group too: call it from a thread."""
        payload = init_group_request(master_address, master_port, rank_offset, world_size, group_name, backend)
        check_result("/init_weights_update_group", self.client.post("/init_weights_update_group", payload))

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, flush_cache: bool) -> None:
        """Blocks until rank 0 has broadcast every tensor named: call it from a thread."""
        payload = distributed_update_request(names, dtypes, shapes, group_name, flush_cache)
        check_result("/update_weights_from_distributed", self.client.post("/update_weights_from_distributed", payload))

    def destroy_weights_update_group(self, group_name: str) -> None:
        check_result("/destroy_weights_update_group",
                     self.client.post("/destroy_weights_update_group", {"group_name": group_name}))

    def flush_cache(self) -> None:
        """SGLang answers text, with HTTP 400 when requests are still running (raised as an error)."""
        self.client.post("/flush_cache", as_json=False)

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        check_result("/release_memory_occupation", self.client.post("/release_memory_occupation", memory_request(tags)))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        check_result("/resume_memory_occupation", self.client.post("/resume_memory_occupation", memory_request(tags)))

    def close(self) -> None:
        """Stop the server if rlcore launched it; a server given by URL keeps running."""
        if self.process is not None:
            self.process.stop()
