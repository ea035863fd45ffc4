"""Starting a run's stages: base (what every launcher shares), ray_actors (a Ray actor a stage), threads
(a thread a stage, in this process), run (the `run` and `worker` commands)."""
