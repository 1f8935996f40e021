import pytest
import torch

from ftp_vllm.evaluation import ContinuationBatch
from ftp_vllm.schedule import genetic_search, scaled_schedule, static_fitness

from .conftest import packed_batch


def quadratic(best):
    return lambda s: sum((x - y) ** 2 for x, y in zip(s, best))


def test_mean_is_target_bounds_hold_and_search_is_deterministic():
    best = [0.0, 0.1, 0.6, 0.7, 0.5, 0.1]
    runs = [genetic_search(quadratic(best), 6, 0.3, upper=0.6, population=6, generations=6, seed=3, progress=False)
            for _ in range(2)]
    assert runs[0] == runs[1]
    s = runs[0].schedule
    assert abs(sum(s) / len(s) - 0.3) < 1e-9 and all(0 <= x <= 0.6 for x in s)
    assert runs[0].fitness <= runs[0].uniform_fitness
    assert runs[0].best_per_generation == sorted(runs[0].best_per_generation, reverse=True)


def test_impossible_targets_rejected():
    with pytest.raises(ValueError, match="out of reach"):
        genetic_search(quadratic([0] * 4), 4, 0.9, upper=0.8, progress=False)
    with pytest.raises(ValueError, match="whole number"):
        genetic_search(quadratic([0] * 3), 3, 0.001, progress=False)


def test_scaled_schedule_keeps_shape():
    assert scaled_schedule([0.0, 0.2, 0.4], 0.1) == pytest.approx([0.0, 0.1, 0.2])


def test_static_search_on_tiny_model_beats_uniform(tiny_llama_ref):
    ids, _ = packed_batch([32, 32], seed=2)
    batch = ContinuationBatch.of(ids.view(2, 32), context=24)
    fitness = static_fitness(tiny_llama_ref, batch)
    result = genetic_search(fitness, tiny_llama_ref.num_blocks, 0.3, population=4, generations=3, seed=0, progress=False)
    assert abs(sum(result.schedule) / len(result.schedule) - 0.3) < 1e-9
    assert result.fitness <= result.uniform_fitness
    assert result.fitness == pytest.approx(fitness(result.schedule))
    assert result.uniform_fitness == pytest.approx(fitness([0.3] * 4))
    again = genetic_search(fitness, tiny_llama_ref.num_blocks, 0.3, population=4, generations=3, seed=0, progress=False)
    assert again.schedule == result.schedule


def test_continuation_batch_scores_the_continuation():
    chunks = torch.arange(20).view(2, 10)
    b = ContinuationBatch.of(chunks, context=7)
    assert b.cu_seqlens.tolist() == [0, 10, 20] and b.prompt_lens.tolist() == [7, 7]
    assert b.scored.tolist() == [6, 7, 8, 16, 17, 18] and b.targets.tolist() == [7, 8, 9, 17, 18, 19]


def test_short_windows_keep_the_continuation_length():
    b = ContinuationBatch.of(torch.arange(40).view(2, 20), context=17).short_windows(4)
    assert b.cu_seqlens.tolist() == [0, 7, 14, 21, 28] and b.prompt_lens.tolist() == [4] * 4  # 2 per chunk
    assert b.input_ids[7:14].tolist() == list(range(7, 14)) and b.input_ids[14:21].tolist() == list(range(20, 27))
    assert b.targets.tolist()[:3] == [4, 5, 6]
    with pytest.raises(ValueError, match="no 18-token prompt"):
        ContinuationBatch.of(torch.arange(40).view(2, 20), context=17).short_windows(18)
