"""Helpers of the Gradio demo (`app.py`): evidence panels, input handling. Nothing here loads a model."""
