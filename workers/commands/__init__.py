"""Commands built from the stages, apart from them: `gkd-async score` (score.py: a data set scored once by teacher
scorers) and `gkd-async demo` (demo.py: a teacher, a warm-started student and a GKD run on a built-in task).
"""
