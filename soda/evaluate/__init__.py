"""`soda-eval`: benchmarks of one checkpoint: likelihood pairs, the NLL vector, multiple-choice audio QA, ASR,
TTS, speech-to-speech translation and lm-eval text tasks.

`tasks` is the registry every benchmark joins and `scoring` the shared log-prob bookkeeping; the benchmarks are
`pairs`, `nll`, `mcq` (questions read by `mcq_items`; likelihood, or generation in `mcq_generate`, judged by the
official scorers' ports in `mcq_scorers`) and `asr`, `tts`, `s2st` (generation through `soda.generate`, judged by
the ASR and speaker backends in `backends`), plus `lm_eval`; `report` and `html_report` write the outputs, `cli`
is the command.
"""
