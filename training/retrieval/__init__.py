"""Retrievers behind one protocol (`protocol.py`): exact search here, approximate ones later."""

from training.retrieval.exact import ExactRetriever, read_embedding_table
from training.retrieval.protocol import PAD_ITEM_ID, Retriever, SearchResult

__all__ = ["PAD_ITEM_ID", "ExactRetriever", "Retriever", "SearchResult", "read_embedding_table"]
