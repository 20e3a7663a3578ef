"""OpenAI's Batch API: routes.py (the endpoints), lines.py (the input format), runner.py
(the work, shared by every process on the database), execute.py (a line through its endpoint),
context.py (the store and runner in the app)."""
