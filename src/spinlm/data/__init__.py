"""Data layer: chat JSONL -> Conversation -> (prompt_ids, answer_ids) -> batches."""

from spinlm.data.chat import ROLES, Conversation, Turn, read_chat_jsonl
from spinlm.data.collate import pad_right, spin_custom_collate
from spinlm.data.dataset import LENGTH_POLICIES, LengthReport, SPINDataset, build_dataset, subsample
from spinlm.data.render import ChatRenderer, conversation_to_messages

__all__ = [
    "ROLES",
    "Turn",
    "Conversation",
    "read_chat_jsonl",
    "ChatRenderer",
    "conversation_to_messages",
    "LENGTH_POLICIES",
    "LengthReport",
    "SPINDataset",
    "build_dataset",
    "subsample",
    "pad_right",
    "spin_custom_collate",
]
