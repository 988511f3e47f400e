"""`sdlora ui`: a local web page over the trainer and the tools, served by the standard library's HTTP server.

`server` answers the pages and the `/api` calls (bound to 127.0.0.1 unless told otherwise, basic auth and a CSRF
token on every state-changing call), `roots` keeps every path it reads or writes under the folders it was given,
`options` turns the training options' sections into the page's form and checks a submitted form as
`sdlora train` would, `jobs` runs each training as an `sdlora train` subprocess whose state lives in SQLite (a
job outlives the page and the UI itself), `tools` calls the library's inspect, convert and merge, and `static/`
holds the page (plain HTML, CSS and JavaScript: no build step, nothing fetched from elsewhere).
"""
