"""RecLM-emb versatile item retrieval: the ten item-query tasks, item-embedder training and
evaluation, and a conversational recommender."""
