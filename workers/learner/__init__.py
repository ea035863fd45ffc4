"""The learner: FSDP2 ranks that train the student on scored groups.

Where each part lives:
- rank.py: `LearnerRank`, the loop (resume -> publish -> for each step: train, publish if due, commit, report,
  save if due -> finish), reading like a recipe of the parts below.
- build.py: the student, optimiser and schedule, and the services of a rank (rank 0's or the null ones).
- feed.py: where a step's groups come from: rank 0 reads them through the intake and broadcasts each chunk
  with a typed `Chunk` status; the other ranks receive and decode them.
- intake.py: admission, acceptance, settlement and commit: the staleness and exactly-once contract.
- guards.py: the non-finite policy and the watchdog over the stages' heartbeats.
- publisher.py: weights to the rollout and evaluation, reporter.py: metrics and progress,
  checkpointing.py: sharded checkpoints, resume and the final model, rendezvous.py: the ranks' process group.
"""
