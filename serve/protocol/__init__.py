"""Request/response schemas: TGI generate, OpenAI chat/completions, and the error shapes."""
