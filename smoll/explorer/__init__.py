"""smoll's explorer: a local web page (index.html) and the server that answers it (server.py)."""
