"""Pull dispatch: model workers take jobs from Redis Streams; a front offers /submit, /jobs and the page."""
