"""What runs leave for people: the SQL result store and its schema, the stage summaries, and the
HTML report."""
