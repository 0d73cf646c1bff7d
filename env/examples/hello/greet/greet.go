// Package greet builds greetings; it is the example the build farm's main job builds.
package greet

import (
	"fmt"
	"strings"
)

// Hello returns a greeting for name, or for "world" when name is blank.
func Hello(name string) string {
	name = strings.TrimSpace(name)
	if name == "" {
		name = "world"
	}
	return fmt.Sprintf("Hello, %s!", name)
}

// Shout returns the greeting in upper case.
func Shout(name string) string {
	return strings.ToUpper(Hello(name))
}
