"""`chatretriever serve`: the HTTP server (FastAPI) over a corpus index, and its web page.

Only the command line imports this package (an import-linter contract): nothing in the library
depends on FastAPI. Build the app with `app.create_app(index, encoder, settings)`.
"""
