"""AudioMCQ's verifiable rewards for multiple-choice answers, ported bit for bit.

Source: github.com/inclusionAI/AudioMCQ, `training_scripts/plugin.py` (`audio_choice_accuracy_reward`,
`external_format_reward`), weighted as in `training_scripts/grpo.sh` (`--reward_funcs
external_audio_choice_accuracy external_format --reward_weights 2.0 0.5`). The plugin's printing and its
`try/except` (nothing in these bodies can raise for strings) are left out; the comparisons are the same:

    accuracy  1 if the text inside the first <answer>...</answer> of the completion equals that of the solution,
              stripped and compared lower-cased (a side without tags is taken whole, stripped); else 0.
              The tag search ignores case (re.IGNORECASE) and spans lines (re.DOTALL), as the plugin's.
    format    1 only if the stripped completion starts with `<answer>` and ends with `</answer>` (case-sensitive)
              and holds exactly one of each; else 0.
    total     2.0 * accuracy + 0.5 * format
"""

from __future__ import annotations

import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
ACCURACY_WEIGHT, FORMAT_WEIGHT = 2.0, 0.5  # grpo.sh --reward_weights 2.0 0.5


def _answer(text: str) -> str:
    match = ANSWER.search(text)
    return match.group(1).strip() if match else text.strip()


def accuracy_reward(completion: str, solution: str) -> float:
    """plugin.py `audio_choice_accuracy_reward` for one (completion, solution)."""
    return 1.0 if _answer(completion).lower() == _answer(solution).lower() else 0.0


def format_reward(completion: str) -> float:
    """plugin.py `external_format_reward` for one completion."""
    s = completion.strip()
    if not (s.startswith("<answer>") and s.endswith("</answer>")):
        return 0.0
    if s.count("<answer>") == 1 and s.count("</answer>") == 1 and s.find("<answer>") == 0 \
            and s.rfind("</answer>") == len(s) - 9:
        return 1.0
    return 0.0


def mcq_rewards(completion: str, solution: str) -> dict[str, float]:
    """{"accuracy", "format", "reward"}: both rewards and their weighted sum (grpo.sh's weights)."""
    accuracy, fmt = accuracy_reward(completion, solution), format_reward(completion)
    return {"accuracy": accuracy, "format": fmt, "reward": ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * fmt}
