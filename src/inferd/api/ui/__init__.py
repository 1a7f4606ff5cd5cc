"""The playground page's static files (HTML, JS, CSS), read by ``inferd.api.routes.ui`` as package data."""
