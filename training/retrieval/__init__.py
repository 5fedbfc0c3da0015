"""Retrievers behind one protocol (`protocol.py`): exact search here, approximate ones later."""

from training.retrieval.exact import ExactRetriever, read_embedding_table
from training.retrieval.protocol import PAD_ITEM_ID, Retriever, SearchResult

__all__ = ["ExactRetriever", "PAD_ITEM_ID", "Retriever", "SearchResult", "read_embedding_table"]
