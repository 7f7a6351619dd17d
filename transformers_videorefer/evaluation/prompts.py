"""The prompts VideoRefer-Bench defines: the questions put to the model and the instructions given to the judge."""

from functools import cache
from importlib import resources


VIDEO_PLACEHOLDER = "<video>"
REGION_PLACEHOLDER = "<region>"

BENCH_Q_INSTRUCTION = "Answer with the option's letter from the given choices directly."
BENCH_D_QUESTION = "Please give a detailed description of the highlighted object [<region>] in the video."

JUDGE_SYSTEM_PROMPT_FILE = "bench_d_judge_system.txt"


def bench_q_question(question: str, options: list[str] | tuple[str, ...]) -> str:
    """The Bench-Q prompt: the question with each `<region>` shown as `[<region>]`, the options, the instruction."""
    return (
        question.replace(REGION_PLACEHOLDER, f"[{REGION_PLACEHOLDER}]")
        + " "
        + " ".join(options)
        + ". "
        + (BENCH_Q_INSTRUCTION)
    )


def video_user_message(question: str) -> dict:
    """The user turn of a benchmark conversation: the video placeholder on its own line, then the question."""
    return {"role": "user", "content": f"{VIDEO_PLACEHOLDER}\n{question}"}


@cache
def judge_system_prompt() -> str:
    """The Bench-D judge's system instructions: the four dimensions, the 0-5 scale and the output layout."""
    return resources.files(__package__).joinpath(JUDGE_SYSTEM_PROMPT_FILE).read_text(encoding="utf-8")


def judge_messages(reference: str, prediction: str) -> list[dict]:
    """The chat the Bench-D judge scores: its instructions, then the reference and the predicted description."""
    return [
        {"role": "system", "content": judge_system_prompt()},
        {"role": "user", "content": f"##Correct answer: {reference}\n##Predicted answer: {prediction}\n"},
    ]
