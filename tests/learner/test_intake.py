"""The learner's intake against a real redis-server, without a pipeline: admission, acceptance,
dead-lettering, settlement, commit, trimming and resume (the staleness and exactly-once contract)."""

import json

import numpy as np
import pytest

from gkd_async.data.cursor import PromptCursor
from gkd_async.data.prompt import Prompt
from gkd_async.transport.limits import RecordLimits
from gkd_async.transport.records import (
    RolloutRecord,
    ScoredRecord,
    decode_prompt_record,
    encode_rollout_record,
    encode_scored_record,
)
from gkd_async.transport.streams import StreamConsumer, StreamProducer
from workers.learner.intake import Admission, Intake, IntakeSettings, NothingTrainsError

VOCAB = 50
BATCH = 2


def settings_for(names, max_staleness=1, teacher_on=True, dead_limit=0, reweight=False, hidden_size=None):
    return IntakeSettings(
        run_id=names.run_id,
        batch_size=BATCH,
        max_staleness=max_staleness,
        on_policy=True,
        teacher_on=teacher_on,
        k=3,
        temperature=1.0,
        max_record_bytes=2**20,
        limits=RecordLimits(VOCAB, max_prompt_length=8, max_new_tokens=6),
        max_dead_groups_in_a_row=dead_limit,
        reweight_stale=reweight,
        teacher_hidden_size=hidden_size,
    )


def make_intake(client, names, tmp_path, max_staleness=1, prompts=10, dead_limit=0, reweight=False, hidden_size=None):
    items = [Prompt(np.array([1, 2, i % VOCAB], np.int32), {"i": i}) for i in range(prompts)]
    admission = Admission(
        items,
        PromptCursor(len(items), False, 0),
        StreamProducer(client, names.prompts),
        names.run_id,
        BATCH,
        max_staleness,
    )
    consumer = StreamConsumer(client, names.scored, "learner", "learner-0", dead_stream=names.dead, claim_idle_ms=10**6)
    settings = settings_for(names, max_staleness, dead_limit=dead_limit, reweight=reweight, hidden_size=hidden_size)
    return Intake(client, names, consumer, admission, settings, tmp_path / "trained.jsonl")


def scored_payload(names, group, version=0, response=(3, 4), topk_id=5, n=2, behaviour=-0.5, hidden=None):
    response = np.array(response, np.int32)
    rollout = RolloutRecord(
        run_id=names.run_id,
        group_id=group,
        sample_ids=[f"{group}/{i}" for i in range(n)],
        step=0,
        policy_version=version,
        prompt_ids=np.array([1, 2], np.int32),
        response_ids=np.tile(response, n),
        response_lengths=np.full(n, len(response), np.int32),
        behaviour_logprobs=np.full(n * len(response), behaviour, np.float32),
    )
    rows = rollout.num_response_tokens
    ids = np.tile(np.array([topk_id, 6, 7], np.int32), (rows, 1))
    states = None if hidden is None else np.zeros((rows, hidden), np.float32)  # gkd.teacher_signal=hidden
    scored = ScoredRecord(rollout, "t", 1.0, ids, np.full((rows, 3), -2.0, np.float32), teacher_hidden=states)
    return encode_scored_record(scored)


def prompt_groups(client, names):
    return [decode_prompt_record(f[b"d"]).group_id for _, f in client.xrange(names.prompts)]


def poll_all(intake, step=0, published=0, total=100):
    batch = {}
    for _ in range(5):
        intake.poll(step, published, total, batch, block_ms=10)
    return batch


def test_admission_follows_the_staleness_bound(redis_client, names, tmp_path):
    intake = make_intake(redis_client, names, tmp_path, max_staleness=1)
    assert intake.admission.admit(0, 0, 100) == 2 * BATCH  # tags 0 and 1 <= published 0 + 1
    assert intake.admission.admit(0, 0, 100) == 0
    tags = [decode_prompt_record(f[b"d"]).step for _, f in redis_client.xrange(names.prompts)]
    assert tags == [0, 0, 1, 1]
    assert intake.admission.admit(1, 1, 100) == 0  # step 0's groups are not trained yet
    for group in prompt_groups(redis_client, names)[:BATCH]:
        assert intake.admission.settle(group)
    assert not intake.admission.settle("never-admitted")
    assert intake.admission.admit(1, 1, 100) == BATCH  # trained at step 1: one more batch, for step 2


def test_garbage_at_the_learner_changes_nothing_in_flight(redis_client, names, tmp_path):
    intake = make_intake(redis_client, names, tmp_path)
    intake.admission.admit(0, 0, 100)
    admitted = prompt_groups(redis_client, names)
    for i in range(300):
        redis_client.xadd(names.scored, {b"d": b"\x93garbage" + bytes([i % 256])})
    # A well-formed record of a group nobody admitted is not trained either.
    redis_client.xadd(names.scored, {b"d": scored_payload(names, "not-admitted")})
    batch = {}
    for _ in range(200):
        intake.poll(0, 0, 100, batch, block_ms=10)
    assert batch == {}
    assert prompt_groups(redis_client, names) == admitted  # nothing admitted in their place
    assert intake.counters["unadmitted"] == 2 and intake.counters["dead_letters"] == 300
    assert redis_client.xpending(names.scored, "learner")["pending"] == 0


@pytest.mark.parametrize(
    "poison, reason",
    [
        ({"response": (3, VOCAB)}, "outside the vocabulary"),
        ({"topk_id": VOCAB + 7}, "topk_ids holds token id"),
        ({"response": (3,) * 7}, "rollout.max_new_tokens=6"),
        ({"behaviour": float("nan")}, "behaviour_logprobs"),
    ],
)
def test_a_poison_entry_is_dead_lettered_alone_and_its_batch_mates_train(redis_client, names, tmp_path, poison, reason):
    intake = make_intake(redis_client, names, tmp_path, max_staleness=0)
    intake.admission.admit(0, 0, 100)
    good, bad = prompt_groups(redis_client, names)
    redis_client.xadd(names.scored, {b"d": scored_payload(names, bad, **poison)})
    redis_client.xadd(names.scored, {b"d": scored_payload(names, good)})
    batch = poll_all(intake)
    assert list(batch) == [good]
    [(_, dead)] = redis_client.xrange(names.dead)
    assert reason in dead[b"reason"].decode() and dead[b"group_id"].decode() == bad
    # The dead group is settled, so a replacement is admitted and the batch can still fill.
    assert bad not in intake.admission.in_flight and good in intake.admission.in_flight
    replacement = prompt_groups(redis_client, names)[2:]
    assert len(replacement) == 1 and replacement[0] not in (good, bad)


def test_a_record_without_the_teachers_hidden_states_of_its_width_is_dead_lettered(redis_client, names, tmp_path):
    """gkd.teacher_signal=hidden: the learner holds a teacher output layer of one width; a record with other states
    (a scorer of another teacher) or none (a scorer of another config) fails alone, naming what it should be."""
    intake = make_intake(redis_client, names, tmp_path, max_staleness=0, prompts=4, hidden_size=4)
    intake.admission.admit(0, 0, 100)
    good, wide = prompt_groups(redis_client, names)
    redis_client.xadd(names.scored, {b"d": scored_payload(names, wide, hidden=5)})
    redis_client.xadd(names.scored, {b"d": scored_payload(names, good, hidden=4)})
    assert list(poll_all(intake)) == [good]
    none = prompt_groups(redis_client, names)[2]
    redis_client.xadd(names.scored, {b"d": scored_payload(names, none)})
    poll_all(intake)
    reasons = [dead[b"reason"].decode() for _, dead in redis_client.xrange(names.dead)]
    assert "teacher hidden states of width 5, the learner expects width 4" in reasons[0]
    assert "teacher hidden states of none, the learner expects width 4" in reasons[1]


def dead_letter_upstream(client, names, group, reason):
    """A stage before the learner dead-letters the group's rollout, as the teacher does when its engine fails."""
    rollouts = StreamConsumer(client, names.rollouts, "teacher", "t0", dead_stream=names.dead)
    payload = encode_rollout_record(
        RolloutRecord(
            names.run_id,
            group,
            [f"{group}/0"],
            0,
            0,
            np.array([1], np.int32),
            np.array([2], np.int32),
            np.array([1], np.int32),
            np.array([-1.0], np.float32),
        )
    )
    [entry_id] = StreamProducer(client, names.rollouts).add([payload])
    rollouts.dead_letter(entry_id, payload, reason)


def test_a_group_dead_lettered_upstream_is_settled_and_replaced(redis_client, names, tmp_path):
    intake = make_intake(redis_client, names, tmp_path, max_staleness=0)
    intake.admission.admit(0, 0, 100)
    first, second = prompt_groups(redis_client, names)
    dead_letter_upstream(redis_client, names, first, "RuntimeError: engine failed")
    intake.poll(0, 0, 100, {}, block_ms=10)
    assert list(intake.admission.in_flight) == [second, prompt_groups(redis_client, names)[2]]


def test_a_run_whose_every_group_is_dead_lettered_fails_with_the_last_reason(redis_client, names, tmp_path):
    """A reward function that raises on every sample would otherwise send prompts for ever: the limit counts
    in-flight groups dead-lettered in a row; one accepted group starts the count again; garbage never counts."""
    intake = make_intake(redis_client, names, tmp_path, max_staleness=0, prompts=100, dead_limit=5)
    batch = {}
    intake.poll(0, 0, 100, batch, block_ms=10)

    def fail_one(reason="RewardError: my_reward raised TypeError"):
        """Dead-letter one in-flight group upstream, then let the intake settle it (and admit another)."""
        group = next(g for g in intake.admission.in_flight if g not in batch)
        dead_letter_upstream(redis_client, names, group, reason)
        intake.poll(0, 0, 100, batch, block_ms=10)
        return group

    for i in range(20):
        redis_client.xadd(names.scored, {b"d": b"garbage" + bytes([i])})  # dead-lettered, of no group in flight
    for _ in range(4):
        fail_one()
    assert intake.dead_in_a_row == 4 and intake.counters["dead_letters"] > 4  # garbage was dead-lettered too
    accepted = next(g for g in intake.admission.in_flight if g not in batch)
    redis_client.xadd(names.scored, {b"d": scored_payload(names, accepted)})
    for _ in range(20):  # behind what is left of the garbage
        intake.poll(0, 0, 100, batch, block_ms=10)
    assert accepted in batch and intake.dead_in_a_row == 0
    for _ in range(4):
        fail_one()
    assert intake.dead_in_a_row == 4
    with pytest.raises(NothingTrainsError) as err:
        last = None
        last = fail_one("RuntimeError: engine failed")
    assert last is None  # raised while settling the fifth
    message = str(err.value)
    assert "the last 5 prompt groups were all dead-lettered" in message
    assert "4x RewardError: my_reward raised TypeError; 1x RuntimeError: engine failed" in message


def test_stale_samples_send_their_group_again_instead_of_losing_it(redis_client, names, tmp_path):
    intake = make_intake(redis_client, names, tmp_path, max_staleness=0)
    intake.admission.admit(2, 2, 100)
    group = prompt_groups(redis_client, names)[0]
    redis_client.xadd(names.scored, {b"d": scored_payload(names, group, version=1)})  # too old for step 2
    redis_client.xadd(names.scored, {b"d": scored_payload(names, prompt_groups(redis_client, names)[1], version=3)})
    batch = poll_all(intake, step=2, published=2)
    assert batch == {}
    assert intake.counters["dropped_stale"] == 4
    resent = [decode_prompt_record(f[b"d"]) for _, f in redis_client.xrange(names.prompts)][2:]
    assert sorted(r.group_id for r in resent) == sorted(prompt_groups(redis_client, names)[:2])
    assert all(r.min_version == 2 for r in resent)


def test_with_stale_policy_reweight_old_samples_train_and_newer_ones_are_still_dropped(redis_client, names, tmp_path):
    """pipeline.stale_policy=reweight: a group older than the bound is accepted (counted, not sent again); one
    newer than the learner (weights a resume rolled back) is dropped and sent again as with `drop`."""
    intake = make_intake(redis_client, names, tmp_path, max_staleness=0, reweight=True)
    intake.admission.admit(2, 2, 100)
    old, newer = prompt_groups(redis_client, names)[:2]
    redis_client.xadd(names.scored, {b"d": scored_payload(names, old, version=0)})  # two versions past the bound
    redis_client.xadd(names.scored, {b"d": scored_payload(names, newer, version=3)})
    batch = poll_all(intake, step=2, published=2)
    assert list(batch) == [old]
    assert (intake.counters["reweighted_stale"], intake.counters["dropped_stale"]) == (2, 2)
    resent = [decode_prompt_record(f[b"d"]).group_id for _, f in redis_client.xrange(names.prompts)][2:]
    assert resent == [newer]


def test_commit_marks_trained_acknowledges_logs_and_trims(redis_client, names, tmp_path):
    intake = make_intake(redis_client, names, tmp_path, max_staleness=0)
    intake.admission.admit(0, 0, 100)
    groups = prompt_groups(redis_client, names)
    for group in groups:
        redis_client.xadd(names.scored, {b"d": scored_payload(names, group)})
    unread = redis_client.xadd(names.scored, {b"d": b"later"})
    batch = {}
    while len(batch) < BATCH:
        intake.poll(0, 0, 100, batch, block_ms=10)
    accepted = [batch[g] for g in sorted(batch)]
    sample_ids = intake.commit(1, accepted)
    assert sorted(sample_ids) == sorted(f"{g}/{i}" for g in groups for i in range(2))
    assert {k.decode() for k in redis_client.smembers(names.trained_at(1))} == set(sample_ids)
    assert intake.admission.in_flight == {}
    [line] = (tmp_path / "trained.jsonl").read_text().splitlines()
    assert json.loads(line) == {"step": 1, "sample_ids": sample_ids}
    # Acknowledged entries are gone; the one nobody has read yet is kept.
    assert [e for e, _ in redis_client.xrange(names.scored)] == [unread]
    # A second copy of a trained group (a reclaim) is acknowledged, never trained again.
    redis_client.xadd(names.scored, {b"d": scored_payload(names, groups[0])})
    batch = {}
    intake.poll(1, 1, 100, batch, block_ms=10)
    intake.poll(1, 1, 100, batch, block_ms=10)
    assert groups[0] not in batch and intake.counters["duplicates"] == 1


def test_resume_rolls_back_later_steps_and_sends_the_groups_in_flight_again(redis_client, names, tmp_path):
    intake = make_intake(redis_client, names, tmp_path, max_staleness=1)
    intake.admission.admit(0, 0, 100)
    groups = prompt_groups(redis_client, names)
    for group in groups[:BATCH]:
        redis_client.xadd(names.scored, {b"d": scored_payload(names, group)})
    batch = {}
    while len(batch) < BATCH:
        intake.poll(0, 0, 100, batch, block_ms=10)
    checkpoint = intake.state()  # saved at step 0, with 4 groups in flight
    intake.commit(1, [batch[g] for g in sorted(batch)])  # step 1 is trained, then the learner dies
    assert redis_client.scard(names.trained_at(1)) == 4

    resumed = make_intake(redis_client, names, tmp_path, max_staleness=1)
    resumed.restore(json.loads(json.dumps(checkpoint)), step=0)
    assert not redis_client.exists(names.trained_at(1))  # step 1's update was rolled back
    assert (tmp_path / "trained.jsonl").read_text() == ""
    before = len(redis_client.xrange(names.prompts))
    resumed.admission.admit(0, 0, 100)
    resent = [decode_prompt_record(f[b"d"]).group_id for _, f in redis_client.xrange(names.prompts)][before:]
    assert resent == groups  # the groups in flight at the checkpoint, and none new (the bound is full)


def test_trained_marks_stay_bounded_over_a_long_run(redis_client, names, tmp_path):
    """Marks of the newest max_staleness + MARKED_STEPS steps only: Redis holds no more at step 30 than at
    step 5, a copy of a group trained in a recent step is a duplicate, one of an old step is refused as
    unadmitted (it is not in flight), and neither trains."""
    from workers.learner.intake import MARKED_STEPS

    intake = make_intake(redis_client, names, tmp_path, max_staleness=0, prompts=1000)
    trained_groups = {}
    sizes = {}
    for step in range(1, 31):
        intake.admission.admit(step - 1, step - 1, 1000)
        for group in intake.admission.in_flight:
            redis_client.xadd(names.scored, {b"d": scored_payload(names, group, version=step - 1)})
        batch = {}
        while len(batch) < BATCH:
            intake.poll(step - 1, step - 1, 1000, batch, block_ms=10)
        intake.commit(step, [batch[g] for g in sorted(batch)])
        trained_groups[step] = sorted(batch)
        keys = list(redis_client.scan_iter(match=names.trained_pattern))
        sizes[step] = (len(keys), sum(redis_client.memory_usage(k) for k in keys))
    assert sizes[30] == sizes[5] and sizes[30][0] == MARKED_STEPS  # flat: two steps of marks
    for step, counter in ((30, "duplicates"), (2, "unadmitted")):
        before = intake.counters[counter]
        redis_client.xadd(names.scored, {b"d": scored_payload(names, trained_groups[step][0], version=30)})
        batch = {}
        intake.poll(30, 30, 1000, batch, block_ms=10)
        assert not batch and intake.counters[counter] == before + (2 if counter == "unadmitted" else 1), counter
