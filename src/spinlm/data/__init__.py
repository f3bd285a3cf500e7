"""Data layer: a source (file, dataset, hub id, memory) -> Conversation -> (prompt_ids, answer_ids) -> batches."""

from spinlm.data.chat import ROLES, Conversation, Turn, parse_record, read_chat_jsonl
from spinlm.data.collate import pad_right, spin_custom_collate
from spinlm.data.dataset import LENGTH_POLICIES, LengthReport, SPINDataset, Tokenizing, build_dataset, subsample
from spinlm.data.render import ChatRenderer, conversation_to_messages
from spinlm.data.sources import DataSource, read_conversations
from spinlm.data.tokenize import TokenizedSet, tokenize_conversations

__all__ = [
    "ROLES",
    "Turn",
    "Conversation",
    "parse_record",
    "read_chat_jsonl",
    "DataSource",
    "read_conversations",
    "ChatRenderer",
    "conversation_to_messages",
    "TokenizedSet",
    "tokenize_conversations",
    "LENGTH_POLICIES",
    "LengthReport",
    "SPINDataset",
    "Tokenizing",
    "build_dataset",
    "subsample",
    "pad_right",
    "spin_custom_collate",
]
