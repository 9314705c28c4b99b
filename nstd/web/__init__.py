"""The read-only status page: Flask for the routes and templates (escaping included), waitress
to serve them from threads of their own. Nothing here can change a job or a file."""
