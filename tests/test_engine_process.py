"""The engine harness's transport, without an engine: jobs run in the child and answer as JSON,
and a failure or a time-out surfaces with the child's log."""

import pytest

from ftp_vllm.engine_process import EngineError, EngineProcess


def echo(llm, **kwargs):
    print("a line vLLM might log")  # stdout of the child: must not reach the answers
    return {"llm": llm, **kwargs}


def fail(llm):
    raise ValueError("the job's own error")


def hang(llm):
    import time

    time.sleep(60)


def test_jobs_run_in_the_child_and_answer_as_json(tmp_path):
    with EngineProcess(tmp_path / "engine.log", timeout=120) as engine:
        assert engine.run(echo, prompts=["a", "b"], n=2) == {"llm": None, "prompts": ["a", "b"], "n": 2}
        assert engine.run(echo) == {"llm": None}  # the same process answers again
    assert "a line vLLM might log" in (tmp_path / "engine.log").read_text()


def test_a_failing_job_raises_with_the_log_tail(tmp_path):
    with EngineProcess(tmp_path / "engine.log", timeout=120) as engine:
        with pytest.raises(EngineError, match=r"exited with code 1 during 'run'(.|\n)*the job's own error"):
            engine.run(fail)


def test_a_job_past_the_time_limit_is_killed(tmp_path):
    with EngineProcess(tmp_path / "engine.log", timeout=5) as engine:
        with pytest.raises(EngineError, match="timed out and was killed"):
            engine.run(hang)
