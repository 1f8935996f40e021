"""The code paths vLLM takes on CUDA, exercised on the CPU: how a step's prompt lengths reach
the routed layers under each model runner, what stops an engine that could not route, buffers
that stay on their device, and the routed op's output contract with piecewise CUDA graphs.
vLLM's V2 model runner (CUDA's default) cannot start here, so these drive its classes and
interfaces directly."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from vllm import SamplingParams

from ftp_vllm.ladder import Ladder
from ftp_vllm.models import routing
from ftp_vllm.models.routing import RoutingState
from ftp_vllm.models.step import StepPrompts, StepRouting, install_v1_step_source, refuse_unroutable, v2_model_state_cls
from ftp_vllm.models.telemetry import Telemetry
from ftp_vllm.router import Router

pytestmark = pytest.mark.cuda_paths


@pytest.fixture(autouse=True)
def _no_step(monkeypatch):
    monkeypatch.setattr(StepPrompts, "prompt_lens", None)
    monkeypatch.setattr(StepPrompts, "source", None)


def test_v1_runner_sets_prompt_lengths_for_the_real_step_only(monkeypatch):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    seen = []
    monkeypatch.setattr(GPUModelRunner, "_model_forward",
                        lambda self, *a, **k: seen.append((StepPrompts.prompt_lens, StepPrompts.rungs)))
    monkeypatch.setattr(StepPrompts, "rung_of", Ladder([Router(2, 1, 4)], [0.3]).rung_of)
    install_v1_step_source()
    install_v1_step_source()  # idempotent: one wrap
    runner = SimpleNamespace(device=torch.device("cpu"), input_batch=SimpleNamespace(
        num_reqs=2, num_prompt_tokens_cpu_tensor=torch.tensor([70, 5, 99], dtype=torch.int32), req_ids=["a", "b", "c"]),
        requests={r: SimpleNamespace(sampling_params=SamplingParams(extra_args=extra))
                  for r, extra in (("a", {"ftp_sparsity": 0.0}), ("b", None), ("c", None))})
    GPUModelRunner._model_forward(runner)
    assert StepPrompts.source == "v1"
    assert seen[0][0].tolist() == [70, 5] and StepPrompts.prompt_lens is None  # cleared after the step
    assert seen[0][1] == [0, 1] and StepPrompts.rungs is None  # the dense rung asked for; the default


def test_v2_runner_takes_the_model_state_that_records_prompt_lengths(monkeypatch):
    from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    from ftp_vllm.models.llama import FTPLlamaForCausalLM

    model = object.__new__(FTPLlamaForCausalLM)  # what the V2 runner asks of a loaded model
    cls = resolve_model_state_cls(SimpleNamespace(), model)
    assert issubclass(cls, DefaultModelState)
    state = object.__new__(cls)  # a state without a GPU: the parts `prepare_inputs` reads
    state.rope_state, state.supports_mm_inputs, state.prompt_embeds_state = None, False, None
    state.ftp_rungs = {0: 0}
    monkeypatch.setattr(StepPrompts, "rung_of", Ladder([Router(2, 1, 4)], [0.3]).rung_of)
    state.add_request(3, SimpleNamespace(sampling_params=SamplingParams()))  # the default rung
    req_states = SimpleNamespace(req_id_to_index={"a": 3, "b": 0},
                                 prompt_len=SimpleNamespace(gpu=torch.tensor([80, 0, 0, 12], dtype=torch.int32)))
    real = SimpleNamespace(num_reqs=2, req_ids=["a", "b"], idx_mapping=torch.tensor([3, 0]),
                           idx_mapping_np=np.array([3, 0]))
    state.prepare_inputs(real, req_states)
    assert StepPrompts.prompt_lens.tolist() == [12, 80]  # batch order, through the runner's index map
    assert StepPrompts.rungs == [1, 0]
    dummy = SimpleNamespace(num_reqs=2, req_ids=["req_0_x", "req_1_y"], idx_mapping=torch.tensor([0, 1]))
    state.prepare_inputs(dummy, req_states)
    assert StepPrompts.prompt_lens is None
    StepPrompts.prompt_lens = torch.tensor([1])
    state.prepare_dummy_inputs(2, 8)  # CUDA-graph capture
    assert StepPrompts.prompt_lens is None


def test_model_state_registers_itself_as_the_step_source(monkeypatch):
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    monkeypatch.setattr(DefaultModelState, "__init__", lambda self, *a, **k: None)
    v2_model_state_cls()(None, None, None, torch.device("cpu"))
    assert StepPrompts.source == "v2"


def routing_state(monkeypatch) -> RoutingState:
    monkeypatch.setattr(routing, "get_tensor_model_parallel_world_size", lambda: 1)
    router = Router(2, 1, 4)
    router.set_schedule([0.0, 0.3])
    return RoutingState(Ladder([router], [0.15]), {}, 16)


def forward_context(monkeypatch, metadata) -> None:
    monkeypatch.setattr(routing, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(routing, "get_forward_context", lambda: SimpleNamespace(attn_metadata=metadata))


def test_a_step_no_runner_describes_stops_the_engine(monkeypatch):
    state = routing_state(monkeypatch)
    forward_context(monkeypatch, {"layer": SimpleNamespace()})
    with pytest.raises(RuntimeError, match="^ftp-vllm: no prompt lengths reach the routed layers"):
        state.begin_step("layer", torch.zeros(4, dtype=torch.long))
    forward_context(monkeypatch, [{"layer": SimpleNamespace()}] * 2)  # micro-batches
    with pytest.raises(RuntimeError, match="^ftp-vllm: micro-batched steps"):
        state.begin_step("layer", torch.zeros(4, dtype=torch.long))


def test_a_real_step_without_attention_metadata_stops_the_engine(monkeypatch):
    state = routing_state(monkeypatch)
    StepPrompts.source, StepPrompts.prompt_lens = "v1", torch.tensor([80])
    forward_context(monkeypatch, {"another layer": SimpleNamespace()})
    with pytest.raises(RuntimeError, match="^ftp-vllm: a step arrived without attention metadata for layer"):
        state.begin_step("layer", torch.zeros(4, dtype=torch.long))


def test_warm_up_and_profiling_steps_run_stock(monkeypatch):
    state = routing_state(monkeypatch)
    StepPrompts.source = "v2"
    forward_context(monkeypatch, {"layer": SimpleNamespace()})  # a dummy step: no prompt lengths
    state.begin_step("layer", torch.zeros(4, dtype=torch.long))
    assert state.step is None
    forward_context(monkeypatch, None)  # a profiling run: no metadata
    state.begin_step("layer", torch.zeros(4, dtype=torch.long))
    assert state.step is None


def engine_config(backend="FLASH_ATTN", **parallel):
    config = SimpleNamespace(
        parallel_config=SimpleNamespace(use_ubatching=False, prefill_context_parallel_size=1),
        speculative_config=None)
    config.parallel_config.__dict__.update(parallel)
    layers = [SimpleNamespace(attn_backend=SimpleNamespace(get_name=lambda: backend))] * 2
    return config, layers


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN", "CPU_ATTN"])
def test_backends_with_the_request_layout_start(backend):
    refuse_unroutable(*engine_config(backend))


@pytest.mark.parametrize("config, cause", [
    (engine_config("FLASHINFER"), "the FLASHINFER attention backend"),
    (engine_config(use_ubatching=True), "micro-batched steps"),
    (engine_config(prefill_context_parallel_size=2), "prefill context parallelism"),
])
def test_configurations_that_cannot_route_refuse_to_start(config, cause):
    with pytest.raises(ValueError, match=f"^ftp-vllm: {cause}") as error:
        refuse_unroutable(*config)
    assert "\n" not in str(error.value)


def test_speculative_decoding_and_breakable_graphs_refuse_to_start(monkeypatch):
    config, layers = engine_config()
    config.speculative_config = SimpleNamespace()
    with pytest.raises(ValueError, match="^ftp-vllm: speculative decoding"):
        refuse_unroutable(config, layers)
    config.speculative_config = None
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")
    with pytest.raises(ValueError, match="^ftp-vllm: breakable CUDA graphs"):
        refuse_unroutable(config, layers)


class DeviceMixing(TorchFunctionMode):
    """Records every op that mixes tensors of two devices (0-dim CPU scalars aside, which torch
    allows); copies between devices are what they are for, and are not run (a meta tensor has
    no data to copy)."""

    def __init__(self):
        super().__init__()
        self.mixed = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("copy_", "to", "pin_memory", "tolist", "is_pinned"):
            return args[0] if func.__name__ == "copy_" else func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            self.mixed.append((getattr(func, "__name__", str(func)), sorted(devices)))
        return func(*args, **kwargs)


def test_counters_stay_on_the_model_device_and_readers_never_touch_it():
    router = Router(3, 1, 4)
    router.set_schedule([0.0, 0.3, 0.3])
    telemetry = Telemetry(Ladder([router], [0.2]), {}).to("meta")  # a device with no data to read
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool, device="meta")
    is_prompt = torch.tensor([1, 1, 1, 1, 1, 0, 0], dtype=torch.bool, device="meta")
    step = SimpleNamespace(num_prompt=5, num_tokens=7, is_prompt=is_prompt, rungs=None, present=[1])
    step.rung_counts = lambda n: StepRouting.rung_counts(step, n)
    with DeviceMixing() as mode:
        telemetry.begin_step()
        telemetry.count(1, keep, step)
        telemetry.count_keep_all(2, 7)
        telemetry.end_step(step, torch.arange(7, device="meta"), stock_graph=False)
    assert mode.mixed == [], mode.mixed
    assert telemetry.counts.device.type == "meta"
    assert telemetry.stats()["prompt_tokens"] == 0  # the host copy, not the device buffer (no data there)


def test_routed_op_writes_into_the_buffers_its_caller_allocated(monkeypatch):
    from ftp_vllm.models import compiled

    schema = torch.ops.vllm.ftp_routed_layer.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"residual", "output"} and not schema.returns
    normed, residual = torch.randn(5, 8), torch.randn(5, 8)
    layer = SimpleNamespace(routed_block=lambda positions, n, r: (n * 2, r + 1))
    monkeypatch.setattr(compiled, "get_forward_context", lambda: SimpleNamespace(no_compile_layers={"l": layer}))
    output, before = torch.empty_like(normed), residual.clone()
    address = output.data_ptr()
    assert torch.ops.vllm.ftp_routed_layer(torch.arange(5), normed, residual, output, "l") is None
    assert output.data_ptr() == address and torch.equal(output, normed * 2)
    assert torch.equal(residual, before + 1)
