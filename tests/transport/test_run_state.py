"""The run's state as stages read it from Redis: typed, written as the text `inspect` shows."""

from gkd_async.run_state import Phase, RunState


def test_each_state_reads_back_as_written_and_unknown_text_stops_every_stage():
    states = [
        RunState.running(), RunState.stopping("interrupted"), RunState.stopped_at(7), RunState.done(),
        RunState.failed("learner: boom: at step 3"),
    ]  # fmt: skip
    assert [str(s) for s in states] == [
        "running",
        "stopping: interrupted",
        "stopped at step 7",
        "done",
        "failed: learner: boom: at step 3",
    ]  # the words inspect shows, as before the states were typed
    assert [RunState.parse(str(s)) for s in states] == states
    assert [(s.is_running, s.stop_requested, s.ended) for s in states] == [
        (True, False, False), (False, True, False), (False, False, True), (False, False, True), (False, False, True)
    ]  # fmt: skip
    assert RunState.parse("") == RunState.running()  # unset: the launcher has not written it yet
    unknown = RunState.parse("paused")  # written by something else: no stage goes on
    assert unknown.phase is Phase.FAILED and "unknown run state 'paused'" in unknown.detail
