"""`soda-eval`: likelihood benchmarks, the NLL vector and multiple-choice audio QA for one checkpoint.

`scoring` holds the shared log-prob bookkeeping, `tasks` the registry every benchmark joins,
`pairs`/`nll`/`mcq` the benchmarks, `report` the outputs and `cli` the command.
"""
