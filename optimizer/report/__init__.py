"""Reports: one report dict written as JSON, Markdown and HTML."""
