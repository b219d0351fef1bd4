"""Gradio only: the tabs of the arena. Logic lives in rlhf/, SQL in storage/."""
