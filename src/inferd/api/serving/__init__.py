"""Protocol ⇄ engine translation and response assembly."""
