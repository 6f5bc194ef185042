"""The foundation tests' chat prompts: answers run past 64 tokens, so 64 greedy tokens are compared
for each (tests/test_real_model.py, bench/greedy_agreement.py)."""

CHAT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works.",
    "Give me a recipe for pancakes.",
    "Describe the history of the Roman Empire.",
    "What are the benefits of regular exercise? Answer in detail.",
]
