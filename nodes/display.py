"""Results shown on the node in ComfyUI's page, and kept in the prompt's history.

The frontend renders ``ui`` text only for its own preview node, so the text also goes out as a
progress-text message (the frontend's built-in text preview on a node); API clients read the same
text from ``/history`` under the node's outputs (``text``).
"""

from __future__ import annotations

from comfy_api.latest import io, ui

HIDDEN = [io.Hidden.unique_id]  # the node's id in the graph, to address the text to it


def show_on_node(node_id, text: str) -> None:
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI's executor without its server (tests, scripts)
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)


def output_with_text(node_cls, text: str, *values) -> io.NodeOutput:
    """The node's outputs, with ``text`` shown on it and recorded in the history."""
    hidden = getattr(node_cls, "hidden", None)
    show_on_node(getattr(hidden, "unique_id", None), text)
    return io.NodeOutput(*values, ui=ui.PreviewText(text))
