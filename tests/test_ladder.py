"""The sparsity dial without an engine: a ladder's levels and rungs, its checkpoint, each
request's decisions by its own rung in a mixed step, the checks and salts per level."""

import json
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams

from ftp_vllm.checkpoint import CONFIG_FILE, ROUTER_FILE, CheckpointError, load_checkpoint, load_ladder, save_ladder
from ftp_vllm.ladder import Ladder, check_request_level, install_level_check
from ftp_vllm.models import routing
from ftp_vllm.models.routing import RoutingState
from ftp_vllm.prefix_cache import request_salt
from ftp_vllm.router import Router

from .test_step_routing import BLOCK_SIZE, step_metadata


def rung(level: float, seed: int = 0) -> Router:
    """A 3-block router at `level`: one MLP and mean query for every seed 0 rung, thresholds of its own."""
    torch.manual_seed(seed)
    router = Router(3, 1, 4, min_prompt=64)
    for p in router.parameters():
        p.data.normal_()
    router.mean_query.normal_()
    router.set_schedule([0.0, level, 2 * level])
    router.threshold_prompt.copy_(torch.tensor([0.0, 1 + 8 * level, 12 * level]))  # its logits: about -1 to 11
    return router


def rung_config(level: float) -> dict:
    return {"base_model": {"name": "tiny", "num_layers": 3}, "target_sparsity": level, "decode_target_sparsity": 0.0,
            "quality": {"ppl": 1 + level}, "training": {"rescaled": {"command": f"ftp-vllm rescale --sparsity {level}"}}}


@pytest.fixture
def ladder_folder(tmp_path):
    return save_ladder(tmp_path / "dial", [(rung(0.3), rung_config(0.3)), (rung(0.1), rung_config(0.1)),
                                           (rung(0.2), rung_config(0.2))], default=0.2, command="ftp-vllm ladder ...")


def test_a_request_gets_the_highest_rung_at_or_below_its_level():
    ladder = Ladder([rung(0.1), rung(0.2), rung(0.4)], [0.1, 0.2, 0.4])
    assert ladder.levels == [0.0, 0.1, 0.2, 0.4]  # the dense rung comes first
    assert [ladder.rung_index(x) for x in (0.0, 0.05, 0.1, 0.3, 0.4)] == [0, 0, 1, 2, 3]
    assert ladder.rung_index(None) == 3  # the default: the top, unless set
    ladder.set_default(0.25)
    assert ladder.default == 0.2 and ladder.rung_of(SamplingParams()) == 2
    assert ladder.rung_of(SamplingParams(extra_args={"ftp_sparsity": 0})) == 0
    assert not ladder.routes_prompts[0] and not ladder.routes_decode[0] and all(ladder.routes_prompts[1:])
    for bad in (0.41, -0.1, "0.2", None, True, float("nan"), [0.2]):
        with pytest.raises(ValueError, match=r"ftp_sparsity must be a number in \[0, 0.4\]"):
            ladder.check_level(bad)


def test_ladder_checkpoint_round_trip(ladder_folder):
    ladder, config = load_ladder(ladder_folder)
    assert ladder.levels == [0.0, 0.1, 0.2, 0.3] and ladder.default == 0.2
    assert config["schema_version"] == 3 and config["target_sparsity"] == 0.2  # the default rung's
    assert [r["made_by"] for r in config["ladder"]["rungs"]][0] == "ftp-vllm rescale --sparsity 0.1"
    for level in (0.1, 0.2, 0.3):
        want = rung(level)
        got, rung_cfg = load_checkpoint(ladder_folder, level=level)
        assert rung_cfg["target_sparsity"] == level and rung_cfg["quality"] == {"ppl": 1 + level}
        for key, value in want.state_dict().items():
            assert torch.equal(got.state_dict()[key], value), key
    assert load_checkpoint(ladder_folder)[1]["target_sparsity"] == 0.2
    with pytest.raises(CheckpointError, match="dense model"):
        load_checkpoint(ladder_folder, level=0.05)


def test_single_level_checkpoints_are_ladders_of_two(tmp_path):
    from ftp_vllm.checkpoint import save_checkpoint

    folder = save_checkpoint(tmp_path / "one", rung(0.3), rung_config(0.3))
    ladder, _ = load_ladder(folder)
    assert ladder.levels == [0.0, 0.3] and ladder.default == 0.3
    assert torch.equal(ladder.rungs[0].mlp.fc1.weight, ladder.rungs[1].mlp.fc1.weight)
    assert all(ladder.rungs[0].is_dense(b) for b in range(3))
    with pytest.raises(CheckpointError, match="one level"):
        load_checkpoint(folder, level=0.3)


def test_bad_ladders_are_refused(tmp_path, ladder_folder):
    with pytest.raises(CheckpointError, match="share one router"):
        save_ladder(tmp_path / "x", [(rung(0.1), rung_config(0.1)), (rung(0.2, seed=1), rung_config(0.2))], 0.2)
    with pytest.raises(CheckpointError, match="default level"):
        save_ladder(tmp_path / "y", [(rung(0.1), rung_config(0.1)), (rung(0.2), rung_config(0.2))], 0.3)
    from safetensors.torch import load_file, save_file

    state = load_file(str(ladder_folder / ROUTER_FILE))
    state["threshold_prompt"] = state["threshold_prompt"][:2]
    save_file(state, str(ladder_folder / ROUTER_FILE))
    with pytest.raises(CheckpointError, match="threshold_prompt"):
        load_ladder(ladder_folder)
    config = json.loads((ladder_folder / CONFIG_FILE).read_text())
    (ladder_folder / CONFIG_FILE).write_text(json.dumps({**config, "schema_version": 2}))
    with pytest.raises(CheckpointError, match="schema version 2"):
        load_ladder(ladder_folder)


def test_each_request_is_decided_by_its_own_rung_in_a_mixed_step(monkeypatch):
    """A step holding requests at three levels decides each request's tokens as a step of
    that level alone would; the dense level's tokens are all kept and counted at level 0."""
    monkeypatch.setattr(routing, "get_tensor_model_parallel_world_size", lambda: 1)
    ladder = Ladder([rung(0.1), rung(0.3)], [0.1, 0.3])
    state = RoutingState(ladder, {}, BLOCK_SIZE)
    state.score_weight, state.score_bias = torch.randn(3, 8), torch.randn(3)
    requests = [(100, 0, 100), (120, 40, 80), (90, 0, 90), (200, 10, 60)]
    metadata, positions, num_slots = step_metadata(requests)
    cache = torch.randn(3, num_slots)
    normed = torch.randn(len(positions), 8)
    cu = metadata.query_start_loc.tolist()

    def decide(rungs):
        monkeypatch.setattr(routing.StepPrompts, "rungs", rungs)
        state.step = routing.StepRouting.of(metadata, positions, ladder)
        state.step.with_context(metadata, BLOCK_SIZE)
        state.score_cache = cache.clone()
        return [state.decide(b, normed, None, positions, num_slots) for b in (1, 2)]

    mixed_rungs = [2, 0, 1, 2]
    before = state.telemetry.counts.clone()
    mixed = decide(mixed_rungs)
    counted = state.telemetry.counts - before
    alone = {r: decide([r] * len(requests)) for r in (1, 2)}
    for req, r in enumerate(mixed_rungs):
        tokens = slice(cu[req], cu[req + 1])
        for b in range(2):
            if r == 0:
                assert mixed[b][tokens].all()
            else:
                assert torch.equal(mixed[b][tokens], alone[r][b][tokens]), (req, b)
    assert not torch.stack(mixed)[:, cu[0]:cu[1]].all() and not torch.stack(mixed)[:, cu[2]:cu[3]].all()  # both skip
    assert any(not torch.equal(a, b) for a, b in zip(alone[1], alone[2]))  # and decide differently
    assert counted[0, 1].tolist() == [80, 80, 0, 0]  # the dense rung's request: its 80 tokens, all kept
    assert counted[2, 1, 1] == 160 and counted[1, 1, 1] == 90
    stats = state.telemetry.stats(counted)
    assert [row["level"] for row in stats["levels"]] == [0.0, 0.1, 0.3]
    assert stats["levels"][0]["prompt_sparsity"] == 0.0 and stats["levels"][2]["prompt_sparsity"] > 0


def test_a_step_of_dense_level_requests_routes_nowhere(monkeypatch):
    monkeypatch.setattr(routing, "get_tensor_model_parallel_world_size", lambda: 1)
    state = RoutingState(Ladder([rung(0.3)], [0.3]), {}, BLOCK_SIZE)
    metadata, positions, _ = step_metadata([(100, 0, 100), (120, 0, 120)])
    monkeypatch.setattr(routing.StepPrompts, "rungs", [0, 0])
    state.step = routing.StepRouting.of(metadata, positions, state.ladder)
    assert state.step.num_routed_prompt == 0 and not any(state.routes(b) for b in range(3))


class Config:
    def __init__(self, router, default=None):
        hf = SimpleNamespace(ftp_router=router, ftp_sparsity=default)
        self.model_config = SimpleNamespace(hf_config=hf)


def test_levels_are_checked_and_salted_per_engine(ladder_folder):
    config = Config(str(ladder_folder))
    check_request_level(config, SamplingParams(extra_args={"ftp_sparsity": 0.3}))
    check_request_level(config, SamplingParams(extra_args={"other": "x"}))
    with pytest.raises(ValueError, match=r"\[0, 0.3\]"):
        check_request_level(config, SamplingParams(extra_args={"ftp_sparsity": 0.5}))
    check_request_level(Config(None), SamplingParams(extra_args={"ftp_sparsity": 0}))
    with pytest.raises(ValueError, match="without an FTP router"):
        check_request_level(Config(None), SamplingParams(extra_args={"ftp_sparsity": 0.2}))
    at = lambda level: SamplingParams(extra_args={"ftp_sparsity": level})  # noqa: E731
    assert request_salt(config, 300, at(0.25)) == "ftp-0.2-prompt-300"  # the rung's level
    assert request_salt(config, 300, at(0.2)) == request_salt(config, 300, SamplingParams())  # the default
    assert request_salt(config, 300, at(0.3)) == "ftp-0.3-prompt-300"
    assert request_salt(config, 300, at(0.0)) is None  # dense: shares with stock
    assert request_salt(Config(str(ladder_folder), 0.1), 300, SamplingParams()) == "ftp-0.1-prompt-300"


def test_input_processor_refuses_a_bad_level_as_the_clients_error(monkeypatch, ladder_folder):
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    monkeypatch.setattr(InputProcessor, "_validate_params", lambda self, params, *a, **k: None)
    install_level_check()
    install_level_check()  # idempotent: one wrap
    processor = InputProcessor.__new__(InputProcessor)
    processor.vllm_config = Config(str(ladder_folder))
    processor._validate_params(SamplingParams(extra_args={"ftp_sparsity": 0.1}), ())
    with pytest.raises(VLLMValidationError, match="ftp_sparsity must be a number"):
        processor._validate_params(SamplingParams(extra_args={"ftp_sparsity": "fast"}), ())


def test_dial_plot_lines_up_each_levels_quality_and_speed(tmp_path):
    from .conftest import load_benchmark

    dial_plot = load_benchmark("dial_plot")
    accuracy = {"results": [
        {"method": "dense", "router": None, "ppl_ratio": 1.0, "cloze_retention": 1.0,
         "cloze_retention_ci95_paired": [1.0, 1.0], "sparsity_prompt_routed": 0.0},
        {"method": "ftp", "router": "dial@0.3", "ppl_ratio": 1.12, "cloze_retention": 0.93,
         "cloze_retention_ci95_paired": [0.9, 0.95], "sparsity_prompt_routed": 0.301},
        {"method": "ftp", "router": "dial@0.1", "ppl_ratio": 1.03, "cloze_retention": 0.99,
         "cloze_retention_ci95_paired": [0.98, 1.0], "sparsity_prompt_routed": 0.1},
        {"method": "shortgpt", "router": None, "ppl_ratio": 1.5, "cloze_retention": 0.9,
         "cloze_retention_ci95_paired": [0.8, 0.95]}]}
    throughput = {"results": [
        {"workload": "prompt-heavy", "method": "dense", "router": None, "ratio_to_dense": 1.0},
        {"workload": "prompt-heavy", "method": "ftp", "router": "dial@0.3", "ratio_to_dense": 1.2},
        {"workload": "prompt-heavy", "method": "ftp", "router": "s30", "ratio_to_dense": 1.25}]}
    rows = dial_plot.dial_rows(accuracy, throughput)
    assert [(r["level"], r["ppl_ratio"], r["throughput_ratio"]) for r in rows] == \
        [(0.0, 1.0, 1.0), (0.1, 1.03, None), (0.3, 1.12, 1.2)]
    assert "| 0.3 | 30.1% | 1.120 | 0.930 [0.900, 0.950] | 1.20 |" in dial_plot.format_table(rows)
    dial_plot.plot(rows, tmp_path / "dial.png")
    assert (tmp_path / "dial.png").stat().st_size > 0
