"""The recipes' data sets: commonsense (LLM-Adapters format), GLUE (original tsv files or the hub), VTAB-1k."""
