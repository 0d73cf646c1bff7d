package greet

import "testing"

func TestHello(t *testing.T) {
	cases := map[string]string{
		"":       "Hello, world!",
		"  ":     "Hello, world!",
		"gopher": "Hello, gopher!",
	}
	for in, want := range cases {
		if got := Hello(in); got != want {
			t.Errorf("Hello(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestShout(t *testing.T) {
	if got, want := Shout("go"), "HELLO, GO!"; got != want {
		t.Errorf("Shout = %q, want %q", got, want)
	}
}
